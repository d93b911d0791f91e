//! Writers beside a gc (README, "What may run beside gc"): a push or the daemon waits
//! while a live gc marker is in the cache and goes on once it is done, or once its
//! heartbeat has stopped long enough; and a push planned before a gc never publishes a
//! narinfo whose reference a gc removed meanwhile: that path fails transiently, and a
//! rerun (or the daemon's retry) uploads it again.
//!
//! The gc is played by hand: the test writes the marker (`running`, then `done` with the
//! same generation) and deletes what the gc would. On S3 the bucket is shared (see
//! `s3.rs`) and the marker sits at its root, where every other test's writer would see
//! it: here the writers read it under a key of this test's own ([`GcCache`]).
//!
//! In [`beside_a_real_gc`] the real gc runs beside a real push instead, in a cache of
//! its own (a `file://` directory, or S3's gc bucket).
use crate::helpers::*;
use narflow::cache::gc_marker::{MARKER_KEY, Marker};
use narflow::cache::{BinaryCache, CacheError, NarUpload, Published};
use narflow::format::narinfo::NarInfo;
use narflow::format::store_path::StorePath;
use narflow::pipeline::outcome::{Failure, NoProgress, Outcome, Progress, PushReport};
use narflow::pipeline::{self, PushOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where a test's cache is, and how the test plays gc on it.
enum Dest {
    File(PathBuf),
    S3 { url: String, client: Box<S3Client> },
}

impl Dest {
    fn url(&self) -> String {
        match self {
            Dest::File(dir) => format!("file://{}", dir.display()),
            Dest::S3 { url, .. } => url.clone(),
        }
    }
    fn put(&self, key: &str, body: &[u8]) {
        match self {
            Dest::File(dir) => std::fs::write(dir.join(key), body).unwrap(),
            Dest::S3 { client, .. } => client.put(key, body),
        }
    }
    fn delete(&self, key: &str) {
        match self {
            Dest::File(dir) => std::fs::remove_file(dir.join(key)).unwrap(),
            Dest::S3 { client, .. } => client.delete(key),
        }
    }
    fn has(&self, key: &str) -> bool {
        match self {
            Dest::File(dir) => dir.join(key).exists(),
            Dest::S3 { client, .. } => client.exists(key),
        }
    }
    fn text(&self, key: &str) -> Option<String> {
        match self {
            Dest::File(dir) => std::fs::read_to_string(dir.join(key)).ok(),
            Dest::S3 { client, .. } => client.get_text(key),
        }
    }
}

/// The marker a test's writers read: at the root of a file:// cache of its own, under a
/// key of its own in the shared bucket.
fn marker_key(dest: &Dest) -> String {
    match dest {
        Dest::File(_) => MARKER_KEY.to_owned(),
        Dest::S3 { .. } => format!("{}/{MARKER_KEY}", unique("gc-writers-marker")),
    }
}

/// Writes the marker as a gc would.
fn write_marker(dest: &Dest, key: &str, generation: u64, running: bool, beat: u64) {
    let m = Marker {
        generation,
        running,
        beat,
    };
    dest.put(key, m.render().as_bytes());
}

/// A gc played by hand between a push's look at the cache and its first upload: marker
/// running, `victims` deleted (referrers first, as gc does), marker done.
struct GcAtFirstUpload {
    generation: u64,
    victims: Vec<String>,
}

/// What a test and its writers' caches share: where the cache is, the marker's key,
/// the readings of the marker so far (to await a writer's wait), the gc to play, and
/// every narinfo written while a reference of it was not in the cache.
struct GcState {
    dest: Dest,
    marker: String,
    reads: (Mutex<usize>, Condvar),
    gc: Mutex<Option<GcAtFirstUpload>>,
    /// Run at the first time the push reaches its point; every upload and publishing
    /// waits until it returns.
    hook: Mutex<Option<(Point, Hook)>>,
    broken: Mutex<Vec<String>>,
}

impl GcState {
    fn new(dest: Dest) -> Arc<Self> {
        let marker = marker_key(&dest);
        Self::with_marker(dest, marker)
    }

    /// Writers reading the marker at `marker`.
    fn with_marker(dest: Dest, marker: String) -> Arc<Self> {
        Arc::new(GcState {
            dest,
            marker,
            reads: Default::default(),
            gc: Mutex::new(None),
            hook: Mutex::new(None),
            broken: Mutex::new(Vec::new()),
        })
    }

    fn readings(&self) -> usize {
        *self.reads.0.lock().unwrap()
    }

    /// Waits until the marker has been read `n` times.
    fn await_reads(&self, n: usize) {
        let (count, cv) = &self.reads;
        let (count, timeout) = cv
            .wait_timeout_while(count.lock().unwrap(), Duration::from_secs(120), |c| *c < n)
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "{} readings of the marker, not {n}",
            *count
        );
    }

    /// Writes the marker as a gc would.
    fn marker(&self, generation: u64, running: bool, beat: u64) {
        write_marker(&self.dest, &self.marker, generation, running, beat);
    }

    fn broken(&self) -> Vec<String> {
        self.broken.lock().unwrap().clone()
    }
}

/// The cache a test's writers use: the real one, reading the gc marker at the test's key,
/// playing the test's gc at the first upload, recording broken narinfos.
struct GcCache {
    inner: Box<dyn BinaryCache>,
    s: Arc<GcState>,
}

impl std::fmt::Debug for GcCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcCache").finish_non_exhaustive()
    }
}

impl GcCache {
    fn new(s: &Arc<GcState>) -> Self {
        let url = narflow::cache::url::CacheUrl::parse(&s.dest.url()).unwrap();
        GcCache {
            inner: narflow::cache::open(&url, &open_options(&url)).unwrap(),
            s: s.clone(),
        }
    }
}

/// What a test runs at a point of its push ([`GcState::hook`]).
type Hook = Box<dyn FnOnce() + Send>;

/// Where a test's hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    /// At the first NAR upload (after the push's look).
    FirstUpload,
    /// Once the first narinfos (and, on `file://`, their NARs) are written.
    AfterFirstWave,
}

impl GcCache {
    /// Runs the test's hook if it is for `at`; held while it runs, so every NAR upload
    /// waits for it too (and publishing, which it runs in).
    fn hook(&self, at: Point) {
        let mut hook = self.s.hook.lock().unwrap();
        if hook.as_ref().is_some_and(|(p, _)| *p == at) {
            (hook.take().unwrap().1)();
        }
    }

    /// Records each of `narinfos` about to be written while a reference of it is not in
    /// the cache.
    fn check_references(&self, store_dir: &str, narinfos: &[NarInfo]) {
        for n in narinfos {
            for r in n.references.iter().filter(|r| **r != n.store_path) {
                if !self.s.dest.has(&narinfo_key(&r.to_absolute(store_dir))) {
                    self.s.broken.lock().unwrap().push(format!(
                        "{} written while its reference {r} is not in the cache",
                        n.store_path
                    ));
                }
            }
        }
    }
}

impl BinaryCache for GcCache {
    fn url(&self) -> &str {
        self.inner.url()
    }
    fn ensure_cache_info(&self, store_dir: &str) -> Result<(), CacheError> {
        self.inner.ensure_cache_info(store_dir)
    }
    fn has_narinfo(&self, path: &StorePath) -> Result<bool, CacheError> {
        self.inner.has_narinfo(path)
    }
    fn has_narinfos(&self, paths: &[StorePath]) -> Result<Vec<bool>, CacheError> {
        self.inner.has_narinfos(paths)
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
    fn get_narinfos(&self, paths: &[StorePath]) -> Result<Vec<Option<String>>, CacheError> {
        self.inner.get_narinfos(paths)
    }
    fn get_text(&self, key: &str) -> Result<Option<String>, CacheError> {
        if key != MARKER_KEY {
            return self.inner.get_text(key);
        }
        let text = self.inner.get_text(&self.s.marker);
        *self.s.reads.0.lock().unwrap() += 1;
        self.s.reads.1.notify_all();
        text
    }
    fn begin_nar(&self, nar_size: u64) -> Result<Box<dyn NarUpload>, CacheError> {
        if let Some(gc) = self.s.gc.lock().unwrap().take() {
            self.s.marker(gc.generation, true, 0);
            for key in &gc.victims {
                self.s.dest.delete(key);
            }
            self.s.marker(gc.generation, false, 1);
        }
        self.hook(Point::FirstUpload);
        self.inner.begin_nar(nar_size)
    }
    fn put_narinfo(&self, path: &StorePath, text: &str) -> Result<(), CacheError> {
        self.inner.put_narinfo(path, text)
    }
    fn put_narinfos(&self, narinfos: &[(StorePath, String)]) -> Result<(), CacheError> {
        self.inner.put_narinfos(narinfos)
    }
    fn publish_narinfos(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
    ) -> Result<Vec<Published>, CacheError> {
        self.check_references(store_dir, &narinfos);
        let published = self.inner.publish_narinfos(store_dir, narinfos);
        self.hook(Point::AfterFirstWave);
        published
    }
    fn publish_narinfos_by(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
        deadline: Instant,
    ) -> Result<Vec<Published>, CacheError> {
        self.check_references(store_dir, &narinfos);
        let published = self
            .inner
            .publish_narinfos_by(store_dir, narinfos, deadline);
        self.hook(Point::AfterFirstWave);
        published
    }
    fn put_object(&self, key: &str, bytes: &[u8], content_type: &str) -> Result<(), CacheError> {
        self.inner.put_object(key, bytes, content_type)
    }
    fn upload_concurrency(&self) -> usize {
        self.inner.upload_concurrency()
    }
    fn narinfos_in_flight(&self) -> usize {
        self.inner.narinfos_in_flight()
    }
    fn sync(&self) -> Result<(), CacheError> {
        self.inner.sync()
    }
}

fn dest_file(dir: &Path) -> Dest {
    Dest::File(dir.join("cache"))
}

fn dest_s3() -> Option<Dest> {
    let env = s3_env()?;
    Some(Dest::S3 {
        url: env.url(""),
        client: Box::new(env.client()),
    })
}

fn store() -> narflow::store::LocalStore {
    narflow::store::LocalStore::open("/nix/store", Path::new("/nix/var/nix/db/db.sqlite"))
}

fn push_options(key: &NixKey) -> PushOptions {
    let sk =
        narflow::format::signing::SigningKey::parse(&std::fs::read_to_string(&key.secret).unwrap())
            .unwrap();
    PushOptions::new(
        narflow::format::compression::CompressionSettings::new(
            narflow::format::compression::Compression::Zstd,
            None,
        )
        .unwrap(),
        vec![sk],
    )
}

fn store_path(full: &str) -> StorePath {
    StorePath::from_absolute_path(full, "/nix/store").unwrap()
}

fn push(
    cache: &GcCache,
    opts: &PushOptions,
    paths: &[String],
    progress: &dyn Progress,
) -> PushReport {
    let paths: Vec<StorePath> = paths.iter().map(|p| store_path(p)).collect();
    pipeline::push(&store(), cache, &paths, opts, progress).unwrap()
}

fn outcome<'r>(report: &'r PushReport, path: &str) -> &'r Outcome {
    &report
        .results
        .iter()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("no result for {path}: {:?}", report.results))
        .outcome
}

/// The closure invariant over `paths`: every visible narinfo's references are visible.
fn assert_closed(dest: &Dest, paths: &[String]) {
    for p in paths {
        let Some(text) = dest.text(&narinfo_key(p)) else {
            continue;
        };
        let n = NarInfo::parse(&text, "/nix/store").unwrap();
        assert!(dest.has(&n.url), "{p}: its NAR {} is missing", n.url);
        for r in &n.references {
            assert!(
                dest.has(&narinfo_key(&r.to_absolute("/nix/store"))),
                "{p}: its reference {r} is missing"
            );
        }
    }
}

/// dep <- app: dep is pushed, the push of app finds it present; a gc removes dep's
/// narinfo after that look and before app's wave. app is not published (transiently);
/// a rerun uploads dep again and publishes app.
fn a_reference_removed_after_the_look_is_not_referred_to(dest: Dest) {
    let key = nix_generate_key("gc-writers-ref");
    let app = nix_build_chain("gc-writers-ref", 2);
    let closure = nix_closure(&app);
    let dep = closure.iter().find(|p| **p != app).unwrap().clone();
    let gc = GcState::new(dest);
    let cache = GcCache::new(&gc);
    let mut opts = push_options(&key);
    every_wave_reads_the_marker(&mut opts);
    let first = push(&cache, &opts, std::slice::from_ref(&dep), &NoProgress);
    assert_eq!(first.failed().count(), 0, "{:?}", first.results);

    *gc.gc.lock().unwrap() = Some(GcAtFirstUpload {
        generation: 0x9c_0001,
        victims: vec![narinfo_key(&dep)],
    });
    let report = push(&cache, &opts, std::slice::from_ref(&app), &NoProgress);
    assert!(gc.gc.lock().unwrap().is_none(), "the gc ran");
    assert_eq!(outcome(&report, &dep), &Outcome::AlreadyPresent);
    match outcome(&report, &app) {
        Outcome::Failed(f @ Failure::RemovedByGc { .. }) => {
            assert!(f.is_transient(), "{f}");
            assert!(f.to_string().contains(&narinfo_key(&dep)), "{f}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!gc.dest.has(&narinfo_key(&app)));
    assert_eq!(gc.broken(), Vec::<String>::new());

    let rerun = push(&cache, &opts, std::slice::from_ref(&app), &NoProgress);
    assert_eq!(rerun.failed().count(), 0, "{:?}", rerun.results);
    assert!(matches!(outcome(&rerun, &dep), Outcome::Uploaded { .. }));
    assert!(matches!(outcome(&rerun, &app), Outcome::Uploaded { .. }));
    assert_eq!(gc.broken(), Vec::<String>::new());
    assert_closed(&gc.dest, &closure);
    if let Dest::File(_) = gc.dest {
        assert_nix_substitutes(&gc.dest.url(), &key, &closure);
    }
}

#[test]
fn a_reference_a_gc_removed_after_the_plan_fails_the_referrer_and_a_rerun_publishes_it_file() {
    let dir = tempdir();
    a_reference_removed_after_the_look_is_not_referred_to(dest_file(dir.path()));
}

#[test]
fn a_reference_a_gc_removed_after_the_plan_fails_the_referrer_and_a_rerun_publishes_it_s3() {
    if let Some(dest) = dest_s3() {
        a_reference_removed_after_the_look_is_not_referred_to(dest);
    }
}

/// Reports each wait for a gc on a channel.
struct WaitSignal(Mutex<std::sync::mpsc::Sender<()>>);

impl Progress for WaitSignal {
    fn waiting_for_gc(&self) {
        let _ = self.0.lock().unwrap().send(());
    }
}

/// Quick readings of the marker, and a gc never stale within a test: only `done` lets a
/// writer go on.
fn patient(opts: &mut PushOptions) {
    opts.gc_wait.stale = Duration::from_secs(3600);
    opts.gc_wait.poll = Duration::from_millis(50);
}

/// For a gc played faster than the protocol lets one run (it lists and deletes without
/// waiting its settle period after it announced itself): every wave reads the marker,
/// as it would once the look's reading is no longer fresh.
fn every_wave_reads_the_marker(opts: &mut PushOptions) {
    opts.gc_wait.fresh = Duration::ZERO;
}

/// A push started while a gc runs waits, and publishes once the gc is done.
fn a_push_waits_for_a_running_gc(dest: Dest) {
    let key = nix_generate_key("gc-writers-wait");
    let top = nix_build_chain("gc-writers-wait", 3);
    let closure = nix_closure(&top);
    let gc = GcState::new(dest);
    let cache = GcCache::new(&gc);
    let mut opts = push_options(&key);
    patient(&mut opts);
    cache.ensure_cache_info("/nix/store").unwrap();
    gc.marker(0x9c_0002, true, 0);
    let (tx, waits) = std::sync::mpsc::channel();
    let progress = WaitSignal(Mutex::new(tx));
    std::thread::scope(|s| {
        let pushing = s.spawn(|| push(&cache, &opts, std::slice::from_ref(&top), &progress));
        waits
            .recv_timeout(Duration::from_secs(120))
            .expect("the push reports its wait");
        // Beating: the push reads the marker again and again, publishing nothing.
        gc.marker(0x9c_0002, true, 1);
        gc.await_reads(gc.readings() + 2);
        for p in &closure {
            assert!(
                !gc.dest.has(&narinfo_key(p)),
                "{p} published while the gc runs"
            );
        }
        gc.marker(0x9c_0002, false, 2);
        let report = pushing
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        assert_eq!(report.failed().count(), 0, "{:?}", report.results);
    });
    for p in &closure {
        assert!(gc.dest.has(&narinfo_key(p)), "{p}");
    }
    assert_closed(&gc.dest, &closure);
    assert_eq!(gc.broken(), Vec::<String>::new());
}

#[test]
fn a_push_started_while_a_gc_runs_publishes_only_after_it_is_done_file() {
    let dir = tempdir();
    a_push_waits_for_a_running_gc(dest_file(dir.path()));
}

#[test]
fn a_push_started_while_a_gc_runs_publishes_only_after_it_is_done_s3() {
    if let Some(dest) = dest_s3() {
        a_push_waits_for_a_running_gc(dest);
    }
}

/// A marker whose heartbeat never changes (a gc that died) holds a push only until it is
/// stale.
fn a_stale_marker_does_not_block(dest: Dest) {
    let key = nix_generate_key("gc-writers-stale");
    let top = nix_build_chain("gc-writers-stale", 2);
    let closure = nix_closure(&top);
    let gc = GcState::new(dest);
    let cache = GcCache::new(&gc);
    let mut opts = push_options(&key);
    opts.gc_wait.stale = Duration::from_millis(500);
    opts.gc_wait.poll = Duration::from_millis(50);
    cache.ensure_cache_info("/nix/store").unwrap();
    gc.marker(0x9c_0003, true, 4);
    let (tx, waits) = std::sync::mpsc::channel();
    let report = push(
        &cache,
        &opts,
        std::slice::from_ref(&top),
        &WaitSignal(Mutex::new(tx)),
    );
    assert!(waits.try_recv().is_ok(), "it waited first");
    assert_eq!(report.failed().count(), 0, "{:?}", report.results);
    assert!(gc.dest.text(&gc.marker).unwrap().contains("state running"));
    for p in &closure {
        assert!(gc.dest.has(&narinfo_key(p)), "{p}");
    }
    assert_closed(&gc.dest, &closure);
}

#[test]
fn a_stale_gc_marker_does_not_block_a_push_forever_file() {
    let dir = tempdir();
    a_stale_marker_does_not_block(dest_file(dir.path()));
}

#[test]
fn a_stale_gc_marker_does_not_block_a_push_forever_s3() {
    if let Some(dest) = dest_s3() {
        a_stale_marker_does_not_block(dest);
    }
}

/// `narflow push` itself: it says it waits for the gc, and publishes after `done`.
#[test]
fn narflow_push_says_it_waits_for_a_running_gc_and_publishes_after_it() {
    use std::io::BufRead;
    let dir = tempdir();
    let dest = dest_file(dir.path());
    let key = nix_generate_key("gc-writers-cli");
    let top = nix_build_chain("gc-writers-cli", 2);
    let closure = nix_closure(&top);
    std::fs::create_dir_all(dir.path().join("cache")).unwrap();
    write_marker(&dest, MARKER_KEY, 0x9c_0004, true, 0);
    let mut child = narflow()
        .args(["push", "--json", "--to", &dest.url(), "--key-file"])
        .arg(&key.secret)
        .arg(&top)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let said = lines
        .by_ref()
        .map(Result::unwrap)
        .find(|l| l.contains("is running: waiting until it is done"))
        .expect("push says it waits for the gc");
    assert!(said.contains("00000000009c0004"), "{said}");
    for p in &closure {
        assert!(
            !dest.has(&narinfo_key(p)),
            "{p} published while the gc runs"
        );
    }
    write_marker(&dest, MARKER_KEY, 0x9c_0004, false, 1);
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{rest:?}");
    for p in &closure {
        assert!(dest.has(&narinfo_key(p)), "{p}");
    }
    assert_closed(&dest, &closure);
}

/// Waits until `key` is in the cache.
fn await_object(dest: &Dest, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dest.has(key) {
        assert!(Instant::now() < deadline, "{key} never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon: a path planned before a gc that removed its reference fails transiently
/// and is retried (after the queue's backoff) into a closed cache; a path handed over
/// while a gc runs waits for it to be done.
#[test]
fn the_daemon_retries_a_path_whose_reference_a_gc_removed_and_waits_for_a_running_gc() {
    let dir = tempdir();
    let key = nix_generate_key("gc-writers-daemon");
    let app = nix_build_chain("gc-writers-daemon", 2);
    let closure = nix_closure(&app);
    let dep = closure.iter().find(|p| **p != app).unwrap().clone();
    let later = nix_build_chain("gc-writers-daemon-later", 1);
    let gc = GcState::new(dest_file(dir.path()));
    let mut opts = push_options(&key);
    patient(&mut opts);
    every_wave_reads_the_marker(&mut opts);
    let first = push(
        &GcCache::new(&gc),
        &opts,
        std::slice::from_ref(&dep),
        &NoProgress,
    );
    assert_eq!(first.failed().count(), 0, "{:?}", first.results);
    *gc.gc.lock().unwrap() = Some(GcAtFirstUpload {
        generation: 0x9c_0005,
        victims: vec![narinfo_key(&dep)],
    });

    let socket = dir.path().join("daemon.sock");
    let state = dir.path().join("state");
    let daemon = narflow::daemon::Daemon::bind(narflow::daemon::DaemonConfig {
        socket: socket.clone(),
        state_dir: state.clone(),
        socket_group: None,
        opts,
        batch: narflow::daemon::DEFAULT_BATCH,
        shutdown_timeout: Duration::from_secs(10),
        metrics_listen: None,
        watch_store: None,
        resume_max_age: None,
    })
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let cache = Box::new(GcCache::new(&gc));
    let running = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(daemon.run(store(), cache, async {
            let _ = stopped.await;
        }))
        .unwrap();
    });
    let hook = |path: &str| {
        let out = narflow()
            .args(["hook", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .env("OUT_PATHS", path)
            .env(
                "DRV_PATH",
                "/nix/store/00000000000000000000000000000000-x.drv",
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    hook(&app);
    // The first attempt fails (the gc removed dep after the plan); the retry publishes.
    await_object(&gc.dest, &narinfo_key(&app));
    assert!(gc.gc.lock().unwrap().is_none(), "the gc ran");
    assert_closed(&gc.dest, &closure);

    // A gc runs: a path handed over now waits until it is done.
    gc.marker(0x9c_0006, true, 0);
    let seen = gc.readings();
    hook(&later);
    gc.await_reads(seen + 2);
    gc.marker(0x9c_0006, true, 1);
    gc.await_reads(gc.readings() + 2);
    assert!(
        !gc.dest.has(&narinfo_key(&later)),
        "published while the gc runs"
    );
    gc.marker(0x9c_0006, false, 2);
    await_object(&gc.dest, &narinfo_key(&later));

    let _ = stop.send(());
    running.join().unwrap();
    assert_eq!(gc.broken(), Vec::<String>::new());
}

/// The real gc and a real push at the same time (README, "What may run beside gc"): the
/// gc runs in this process (`narflow gc` runs the same), the push is the pipeline
/// `narflow push` runs, and they hand off so that the gc runs while the push is in flight.
mod beside_a_real_gc {
    use super::*;
    use crate::gc::{STORE_DIR, broken_closures, narinfo, open, verify_all};
    use narflow::maintain::gc::{GcConfig, GcError, GcObserver, GcOutcome};
    use narflow::maintain::gc_plan::{GcPlan, RootReason};
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    /// gc's default grace (`[gc] grace`).
    const GRACE: Duration = Duration::from_secs(24 * 3600);
    /// Older than the grace: what a test makes of the objects it pushed before.
    const OLD: Duration = Duration::from_secs(2 * 24 * 3600);

    /// Sets every object of the `file://` cache at `dir` as written `ago` (ages on the
    /// cache's clock are modification times).
    fn age_objects(dir: &Path, ago: Duration) {
        let when = std::time::SystemTime::now() - ago;
        let mut dirs = vec![dir.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    dirs.push(e.path());
                } else {
                    std::fs::File::open(e.path())
                        .unwrap()
                        .set_modified(when)
                        .unwrap();
                }
            }
        }
    }

    /// A reader looking at the whole cache on another thread until stopped (the last
    /// look starts after the stop): every narinfo it found without its NAR or a
    /// reference, and how many looks it took.
    struct Watcher {
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<(Vec<String>, usize)>,
    }

    impl Watcher {
        fn start(url: &str) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let thread = {
                let (url, stop) = (url.to_owned(), stop.clone());
                std::thread::spawn(move || {
                    let cache = open(&url);
                    let (mut broken, mut looks) = (Vec::new(), 0);
                    // Until a whole look started after the stop.
                    loop {
                        let last = stop.load(Ordering::SeqCst);
                        broken.extend(broken_closures(cache.as_ref()));
                        looks += 1;
                        if last {
                            return (broken, looks);
                        }
                    }
                })
            };
            Watcher { stop, thread }
        }

        fn finish(self) -> (Vec<String>, usize) {
            self.stop.store(true, Ordering::SeqCst);
            self.thread.join().unwrap()
        }
    }

    /// What gc does once planned (its marker running, the cache listed, nothing
    /// deleted yet), after it lets the push go on.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Then {
        /// Deletes at once, while the push publishes.
        Delete,
        /// Deletes once the push says it waits for this gc.
        DeleteOnceThePushWaits,
    }

    /// gc's side of the hand-off.
    struct HandOff {
        then: Then,
        go: mpsc::SyncSender<()>,
        push_waits: mpsc::Receiver<()>,
        /// Whether the push waited for the gc, when awaited.
        push_waited: Option<bool>,
    }

    impl GcObserver for HandOff {
        fn planned(&mut self, _plan: &GcPlan) {
            let _ = self.go.send(());
            if self.then == Then::DeleteOnceThePushWaits {
                // Not a panic here: the heartbeat would keep the push waiting for ever.
                let waited = self.push_waits.recv_timeout(Duration::from_secs(120));
                self.push_waited = Some(waited.is_ok());
            }
        }
    }

    /// What happened when gc and push ran at once.
    struct Beside {
        gc: Result<GcOutcome, GcError>,
        /// Whether the push waited for the gc, when awaited.
        push_waited: Option<bool>,
        report: PushReport,
        /// What the watcher saw broken, in how many looks.
        broken: Vec<String>,
        looks: usize,
        /// The NARs in the cache when the gc started (`file://` only).
        nars_at_start: BTreeSet<String>,
    }

    /// The NARs of the `file://` cache at `dir` (not the files still being written).
    fn nars(dir: &Path) -> BTreeSet<String> {
        std::fs::read_dir(dir.join("nar"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().to_owned())
            .filter(|name| !name.starts_with('.'))
            .map(|name| format!("nar/{name}"))
            .collect()
    }

    /// A push of `top` that starts a real gc keeping `root`'s closure (`grace`, no
    /// settle, two keys a batch) when it reaches `start_at`, and waits there until the
    /// gc has planned; the gc then goes on as `then` says. A watcher reads the cache all
    /// along.
    fn gc_beside_a_push(
        state: &Arc<GcState>,
        opts: &PushOptions,
        top: &str,
        root: &str,
        grace: Duration,
        (start_at, then): (Point, Then),
    ) -> Beside {
        let dir = match &state.dest {
            Dest::File(dir) => Some(dir.clone()),
            Dest::S3 { .. } => None,
        };
        let url = state.dest.url();
        let cfg = GcConfig {
            store_dir: STORE_DIR.to_owned(),
            roots: vec![(
                narflow::maintain::roots::parse_root(root, STORE_DIR).unwrap(),
                RootReason::Closure,
            )],
            keep_newer_than: None,
            grace,
            settle: Duration::ZERO,
            batch_size: 2,
            dry_run: false,
        };
        // One signal each way, sent once: capacity 1 so no sender blocks.
        let (start, started) = mpsc::sync_channel::<()>(1);
        let (go, gone) = mpsc::sync_channel::<()>(1);
        let nars_at_start = Arc::new(Mutex::new(BTreeSet::new()));
        let hook: Hook = {
            let nars_at_start = nars_at_start.clone();
            Box::new(move || {
                if let Some(dir) = dir {
                    *nars_at_start.lock().unwrap() = nars(&dir);
                }
                start.send(()).unwrap();
                // On once gc is where the test wants it, or has ended (sender dropped).
                let _ = gone.recv();
            })
        };
        *state.hook.lock().unwrap() = Some((start_at, hook));
        let (waits_tx, push_waits) = mpsc::channel();
        let progress = WaitSignal(Mutex::new(waits_tx));
        let cache = GcCache::new(state);
        let watcher = Watcher::start(&url);
        let (report, gc) = std::thread::scope(|s| {
            let gc = s.spawn(move || {
                started
                    .recv_timeout(Duration::from_secs(120))
                    .expect("the push uploads a NAR");
                let mut hand = HandOff {
                    then,
                    go,
                    push_waits,
                    push_waited: None,
                };
                let out = narflow::maintain::gc::run(open(&url).as_ref(), &cfg, &mut hand);
                (out, hand.push_waited)
            });
            let report = push(&cache, opts, &[top.to_owned()], &progress);
            (report, gc.join().unwrap())
        });
        let (broken, looks) = watcher.finish();
        Beside {
            gc: gc.0,
            push_waited: gc.1,
            report,
            broken,
            looks,
            nars_at_start: std::mem::take(&mut *nars_at_start.lock().unwrap()),
        }
    }

    /// Asserts `paths` are all in the cache, each with its NAR.
    fn assert_all_there(dest: &Dest, paths: &[String]) {
        for p in paths {
            let text = dest
                .text(&narinfo_key(p))
                .unwrap_or_else(|| panic!("{p} is not in the cache"));
            let n = NarInfo::parse(&text, STORE_DIR).unwrap();
            assert!(dest.has(&n.url), "{p}: its NAR {} is not there", n.url);
        }
    }

    /// A gc with the default grace runs while a push of new closures is in flight (it
    /// starts once the push's first wave is written, and lists it; the push's next waves
    /// go on beside it). Old paths no root keeps go; nothing the push uploaded does,
    /// no reader ever sees a narinfo without its NAR or a reference, and `verify --all`
    /// is clean.
    #[test]
    fn a_gc_with_the_default_grace_beside_a_running_push_deletes_nothing_it_uploads_file() {
        let dir = tempdir();
        let state = GcState::new(dest_file(dir.path()));
        let url = state.dest.url();
        let key = nix_generate_key("gc-beside-push");
        let c = crate::gc::build();
        crate::gc::push(&url, &key, &c);
        age_objects(&dir.path().join("cache"), OLD);
        let reader = open(&url);
        let others_nars: Vec<String> = c
            .others
            .iter()
            .map(|p| narinfo(reader.as_ref(), p).unwrap().url)
            .collect();
        let top = nix_build_chain("gc-beside-push-new", 3);
        let fresh = nix_closure(&top);
        let mut opts = push_options(&key);
        patient(&mut opts);

        let old_nars = nars(&dir.path().join("cache"));
        let b = gc_beside_a_push(
            &state,
            &opts,
            &top,
            &c.a,
            GRACE,
            (Point::AfterFirstWave, Then::Delete),
        );
        assert_eq!(b.broken, Vec::<String>::new(), "after {} looks", b.looks);
        assert!(b.looks > 0);
        let out = b.gc.unwrap();
        assert!(!out.has_problems(), "{out:?}");
        assert_eq!(
            (out.deleted.narinfos, out.deleted.nars),
            (4, 4),
            "B's and C's own old paths went"
        );
        assert_eq!(b.report.failed().count(), 0, "{:?}", b.report.results);
        for p in &fresh {
            assert!(
                matches!(outcome(&b.report, p), Outcome::Uploaded { .. }),
                "{p}"
            );
        }
        assert_eq!(state.broken(), Vec::<String>::new());

        assert_all_there(&state.dest, &fresh);
        // The push's NARs gc listed (of its first wave) are still there.
        let listed: Vec<&String> = b.nars_at_start.difference(&old_nars).collect();
        assert!(
            !listed.is_empty(),
            "no NAR of the push was up when gc listed"
        );
        for nar in listed {
            assert!(state.dest.has(nar), "{nar} went");
        }
        assert_all_there(&state.dest, &c.a_closure);
        for (p, nar) in c.others.iter().zip(&others_nars) {
            assert!(!state.dest.has(&narinfo_key(p)), "{p} was kept");
            assert!(!state.dest.has(nar), "{nar} was kept");
        }
        let (code, text) = verify_all(&url, &key);
        assert_eq!(code, 0, "{text}");
    }

    /// An old path the push finds present and relies on (a reference of what it
    /// uploads), which no root of the gc keeps: the gc starts after the push's look,
    /// deletes it while the push waits to publish, and the push then publishes no
    /// narinfo referring to it (its path fails transiently); no reader ever sees a
    /// narinfo without a reference or its NAR, and a rerun of the push uploads the
    /// reference again and publishes everything. `age` makes what is in the cache older
    /// than `grace`.
    fn a_gc_deleting_an_old_path_a_push_relies_on(
        state: &Arc<GcState>,
        grace: Duration,
        age: &dyn Fn(),
    ) {
        let url = state.dest.url();
        let key = nix_generate_key("gc-beside-push-old");
        let keep = nix_build_chain("gc-beside-push-keep", 1);
        let app = nix_build_chain("gc-beside-push-old", 2);
        let closure = nix_closure(&app);
        let dep = closure.iter().find(|p| **p != app).unwrap().clone();
        run(narflow()
            .args(["push", "--to", &url, "--key-file"])
            .arg(&key.secret)
            .args([&keep, &dep]));
        age();
        let mut opts = push_options(&key);
        patient(&mut opts);
        // This gc's settle period is shortened: it deletes at the push's first upload.
        every_wave_reads_the_marker(&mut opts);

        let b = gc_beside_a_push(
            state,
            &opts,
            &app,
            &keep,
            grace,
            (Point::FirstUpload, Then::DeleteOnceThePushWaits),
        );
        assert_eq!(b.broken, Vec::<String>::new(), "after {} looks", b.looks);
        assert_eq!(
            b.push_waited,
            Some(true),
            "the gc deleted while the push waited"
        );
        let out = b.gc.unwrap();
        assert!(!out.has_problems(), "{out:?}");
        assert_eq!((out.deleted.narinfos, out.deleted.nars), (1, 1), "dep went");
        assert!(!state.dest.has(&narinfo_key(&dep)));
        assert_eq!(outcome(&b.report, &dep), &Outcome::AlreadyPresent);
        match outcome(&b.report, &app) {
            Outcome::Failed(f @ Failure::RemovedByGc { .. }) => {
                assert!(f.is_transient(), "{f}");
                assert!(f.to_string().contains(&narinfo_key(&dep)), "{f}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!state.dest.has(&narinfo_key(&app)));
        assert_eq!(state.broken(), Vec::<String>::new());
        assert_all_there(&state.dest, std::slice::from_ref(&keep));

        // The rerun is `narflow push` itself.
        run(narflow()
            .args(["push", "--to", &url, "--key-file"])
            .arg(&key.secret)
            .arg(&app));
        assert_all_there(&state.dest, &closure);
        let (code, text) = verify_all(&url, &key);
        assert_eq!(code, 0, "{text}");
    }

    /// The objects pushed before are made older than gc's default grace.
    #[test]
    fn a_gc_deleting_an_old_path_a_running_push_relies_on_never_leaves_it_referred_to_file() {
        let dir = tempdir();
        let state = GcState::new(dest_file(dir.path()));
        let cache = dir.path().join("cache");
        a_gc_deleting_an_old_path_a_push_relies_on(&state, GRACE, &|| age_objects(&cache, OLD));
    }

    /// In S3's gc bucket, emptied first; ages cannot be set there, so the gc runs with
    /// `--grace 0` (what the push uploads is not in its listing: it starts at the push's
    /// first upload, every upload waiting).
    #[test]
    fn a_gc_deleting_an_old_path_a_running_push_relies_on_never_leaves_it_referred_to_s3() {
        let Some((env, url)) = crate::gc::s3_gc_bucket() else {
            return;
        };
        let _one = crate::gc::S3_GC
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let empty = tempdir();
        let none = empty.path().join("keep");
        std::fs::write(&none, "").unwrap();
        let (code, _, err) = crate::gc::gc(
            &url,
            &["--keep-file", none.to_str().unwrap(), "--grace", "0"],
        );
        assert_eq!(code, 0, "{err}");
        let dest = Dest::S3 {
            url,
            client: Box::new(env.client()),
        };
        let state = GcState::with_marker(dest, MARKER_KEY.to_owned());
        a_gc_deleting_an_old_path_a_push_relies_on(&state, Duration::ZERO, &|| {});
    }

    /// `narflow gc` (default grace, no settle, two keys a request) and `narflow push` of
    /// a new closure started at the same moment, as processes, three times; before each
    /// round what the cache holds is made older than the grace, so each gc deletes the
    /// closure the round before pushed (no root keeps it). The interleaving is whatever
    /// the two processes make of it: a watcher reads the cache all along, and after each
    /// round the new closure is all there and `verify --all` is clean.
    #[test]
    fn narflow_gc_and_narflow_push_run_at_once_and_keep_the_cache_closed_file() {
        let dir = tempdir();
        let cache = dir.path().join("cache");
        let url = format!("file://{}", cache.display());
        let key = nix_generate_key("gc-beside-push-cli");
        let keep = nix_build_chain("gc-beside-push-cli-keep", 2);
        run(narflow()
            .args(["push", "--to", &url, "--key-file"])
            .arg(&key.secret)
            .arg(&keep));
        let watcher = Watcher::start(&url);
        let mut before: Option<Vec<String>> = None;
        for round in 0..3 {
            let top = nix_build_chain(&format!("gc-beside-push-cli-{round}"), 3);
            let closure = nix_closure(&top);
            age_objects(&cache, OLD);
            let gc = narflow()
                .args([
                    "gc",
                    "--gc-settle",
                    "0",
                    "--gc-batch-size",
                    "2",
                    "--cache",
                    &url,
                ])
                .args(["--keep-closure-of", &keep])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            run(narflow()
                .args(["push", "--to", &url, "--key-file"])
                .arg(&key.secret)
                .arg(&top));
            let gc = gc.wait_with_output().unwrap();
            assert!(
                gc.status.success(),
                "{}",
                String::from_utf8_lossy(&gc.stderr)
            );
            let dest = Dest::File(cache.clone());
            assert_all_there(&dest, &closure);
            assert_all_there(&dest, &nix_closure(&keep));
            if let Some(old) = &before {
                for p in old {
                    assert!(!dest.has(&narinfo_key(p)), "{p} (old, no root) was kept");
                }
            }
            let (code, text) = verify_all(&url, &key);
            assert_eq!(code, 0, "{text}");
            before = Some(closure);
        }
        let (broken, looks) = watcher.finish();
        assert_eq!(broken, Vec::<String>::new(), "after {looks} looks");
    }
}
